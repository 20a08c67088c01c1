//! candle's CPU thread count, fixed once at start-up.
//!
//! candle asks for its thread count on every CPU matmul. Unless `CANDLE_NUM_THREADS` or
//! `RAYON_NUM_THREADS` is set, or the kernel lists CPU capacities (most virtual machines do
//! not), it counts the physical cores by reading and parsing `/proc/cpuinfo`, on every call.
//! A decoding step makes dozens of small matmuls: profiled here (2-core VM), about 4% of a
//! batched decoding run was the kernel formatting `/proc/cpuinfo`. Counting once and putting
//! the count in `CANDLE_NUM_THREADS` keeps candle's choice and drops the cost.

/// Sets `CANDLE_NUM_THREADS` to the count candle would compute, unless it or
/// `RAYON_NUM_THREADS` is already set. Call at start-up, before any other thread exists.
pub fn pin_candle_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_some()
        || std::env::var_os("RAYON_NUM_THREADS").is_some()
    {
        return;
    }
    let n = candle_core::utils::get_num_threads();
    // SAFETY: callers run this before starting any thread (the trainer's `main` and the
    // bench harness, first thing), so no other thread reads the environment concurrently.
    unsafe { std::env::set_var("CANDLE_NUM_THREADS", n.to_string()) };
}
