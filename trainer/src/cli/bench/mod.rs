//! `trainer bench memory`: peak memory of a training step per sequence length, and the
//! counting allocator it reads.

pub mod memory;
pub mod peak_alloc;
