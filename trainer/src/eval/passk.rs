//! pass@k with the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language
//! Models Trained on Code", eq. 1): with `n` attempts of which `c` solved,
//! pass@k = 1 − C(n−c, k) / C(n, k), computed as a product to stay exact in floating point.

/// pass@k of one task; `None` when fewer than `k` attempts were graded (or `k` is 0).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Option<f64> {
    if k == 0 || n < k || c > n {
        return None;
    }
    if n - c < k {
        return Some(1.0);
    }
    // C(n−c, k) / C(n, k) = ∏_{i = n−c+1}^{n} (1 − k / i)
    let miss: f64 = ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product();
    Some(1.0 - miss)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binomial(n: u64, k: u64) -> f64 {
        if k > n {
            return 0.0;
        }
        (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
    }

    #[test]
    fn matches_the_binomial_definition() {
        for n in 1..=12usize {
            for c in 0..=n {
                for k in 1..=n {
                    let direct =
                        1.0 - binomial((n - c) as u64, k as u64) / binomial(n as u64, k as u64);
                    let got = pass_at_k(n, c, k).unwrap();
                    assert!(
                        (got - direct).abs() < 1e-12,
                        "n {n} c {c} k {k}: {got} vs {direct}"
                    );
                }
            }
        }
    }

    #[test]
    fn edge_cases() {
        assert_eq!(pass_at_k(5, 0, 1), Some(0.0));
        assert_eq!(pass_at_k(5, 5, 3), Some(1.0));
        assert_eq!(pass_at_k(4, 2, 1), Some(0.5));
        assert_eq!(pass_at_k(2, 1, 3), None);
        assert_eq!(pass_at_k(2, 1, 0), None);
    }
}
