//! How the process's thread pools share the CPU cores.
//!
//! candle runs elementwise ops of 64K elements and more on a barrier pool of its own, whose workers spin (up to
//! 25 000 rounds) after every job and whose caller spins until they finish; beside it run candle's rayon pool for
//! the GEMMs and the rayon pool of kto-kernels' fused ops. On few cores the spinning takes the cores the GEMMs need:
//! on the 2-core development machine, 20 steps of the tiny model took 4.3 s with candle's pool and 2.4 s without (CPU
//! time 4.4 s against 1.9 s). kto's fused ops do the large elementwise work, so candle's pool stays off (its
//! elementwise ops run on the calling thread) unless `CANDLE_NUM_THREADS` says otherwise.

/// Call first thing in `main`, before any thread exists.
pub fn share_cores() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // No other thread exists yet to read the environment concurrently.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
