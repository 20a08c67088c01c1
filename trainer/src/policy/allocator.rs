//! glibc's allocator tuned for candle on the CPU.
//!
//! candle allocates a fresh buffer for every op's output. glibc serves a buffer above
//! 128 KiB with `mmap` and hands it back with `munmap` when it is freed, so every op of a
//! training step paid page faults and the kernel's zeroing of fresh pages (about 15% of a
//! step in a profile, and more of a decoding step). Raising the thresholds keeps freed
//! buffers in the heap for the next op. Measured here (12.6M-parameter model, 2 cores):
//! training step 1270 → 1440 tokens/s, sampling 900 → 1200 tokens/s.
//!
//! glibc also gives each thread that allocates its own arena, and a training step runs on
//! whichever rayon worker picks it up: each worker's arena then had to grow to a step's
//! size once, so the first step on each worker paid ~120 000 page faults (0.19 s of a 1.3 s
//! step here) and the process held the step's buffers once per worker. One arena is shared
//! by all threads instead; the ops allocate a few buffers each, so its lock is not contended.

/// Buffers up to this size come from the heap (glibc's maximum for this setting is 32 MiB).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free heap memory above this is not returned to the kernel.
const TRIM_THRESHOLD: i32 = 1 << 30;
/// The heap grows in steps of this much, so a step's buffers fit without growing it again.
const TOP_PAD: i32 = 64 << 20;
/// One arena for all threads (see above).
const ARENA_MAX: i32 = 1;

/// Sets the thresholds; call once at start-up, before the model is loaded. A variable
/// `MALLOC_*_` in the environment (glibc's own tunables) takes precedence.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |param: libc::c_int, env: &str, value: i32| {
            if std::env::var_os(env).is_none() {
                // SAFETY: mallopt only changes allocator parameters; any value is accepted
                // or refused (return 0), never undefined.
                let ok = unsafe { libc::mallopt(param, value) };
                if ok == 0 {
                    tracing::debug!(env, value, "mallopt refused a setting");
                }
            }
        };
        set(
            libc::M_MMAP_THRESHOLD,
            "MALLOC_MMAP_THRESHOLD_",
            MMAP_THRESHOLD,
        );
        set(
            libc::M_TRIM_THRESHOLD,
            "MALLOC_TRIM_THRESHOLD_",
            TRIM_THRESHOLD,
        );
        set(libc::M_TOP_PAD, "MALLOC_TOP_PAD_", TOP_PAD);
        set(libc::M_ARENA_MAX, "MALLOC_ARENA_MAX", ARENA_MAX);
    }
}
