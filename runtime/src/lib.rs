//! Container runtimes behind one seam.

#[cfg(feature = "kubernetes")]
pub mod kubernetes;
