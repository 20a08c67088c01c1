//! The CPU thread count of candle and rayon, fixed once at start-up.
//!
//! candle asks for its thread count on every CPU matmul. Unless `RAYON_NUM_THREADS` is set or
//! the kernel ranks the CPUs by capacity (most virtual machines do not), it counts the
//! physical cores by reading and parsing `/proc/cpuinfo`, on every call: 2435 opens of
//! `/proc/cpuinfo` in a 30-second rollout bench here, about 4% of a batched decoding run's
//! samples in the kernel formatting that file. Counting once and putting the count in
//! `RAYON_NUM_THREADS` drops the cost. rayon's global pool (the trainer's own kernels) then
//! has as many threads as candle uses for its matmuls: one per physical core, as PyTorch
//! does, where rayon alone would start one per logical CPU.

/// Sets `RAYON_NUM_THREADS` to the count candle computes, unless it is already set. Call at
/// start-up, before any other thread exists and before rayon's pool is built.
pub fn pin_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let n = candle_core::utils::get_num_threads();
    // SAFETY: callers run this before starting any thread (the trainer's `main` and the
    // bench harness, first thing), so no other thread reads the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
}
