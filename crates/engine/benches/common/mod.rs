//! Helpers shared by the CPU benchmarks.

use std::time::Instant;

/// `n` values in [-0.5, 0.5) in a fixed pattern; `salt` varies it between inputs.
pub fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + salt) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

/// Seconds of one call of `f`, median of `runs`.
pub fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
