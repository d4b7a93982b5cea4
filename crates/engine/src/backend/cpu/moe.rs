//! Router: softmax over all experts, then the top k.

use super::CpuTensor;
use crate::backend::Route;

pub fn route_top_k(logits: &CpuTensor, k: usize, renormalize: bool) -> Vec<Route> {
    logits
        .data
        .chunks_exact(logits.cols)
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
            let total: f32 = exps.iter().sum();
            let mut order: Vec<usize> = (0..row.len()).collect();
            // Largest probability first; ties go to the lower expert index.
            order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
            let mut chosen: Route = order[..k].iter().map(|&e| (e, exps[e] / total)).collect();
            if renormalize {
                let sum: f32 = chosen.iter().map(|&(_, w)| w).sum();
                chosen.iter_mut().for_each(|(_, w)| *w /= sum);
            }
            chosen
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_largest_and_renormalises() {
        let logits = CpuTensor::new(1, 4, vec![0.0, 2.0, 1.0, 2.0]);
        let routes = route_top_k(&logits, 2, true);
        assert_eq!(routes[0].iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((routes[0][0].1 - 0.5).abs() < 1e-6);
        let raw = route_top_k(&logits, 2, false);
        let e2 = 2f32.exp();
        let p = e2 / (1.0 + e2 + 1f32.exp() + e2);
        assert!((raw[0][0].1 - p).abs() < 1e-6);
    }
}
