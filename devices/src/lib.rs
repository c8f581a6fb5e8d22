pub mod e1000;
pub mod interrupt;
pub mod pci;
pub mod virtio;

#[cfg(test)]
mod test_frames;
#[cfg(test)]
mod test_netns;
