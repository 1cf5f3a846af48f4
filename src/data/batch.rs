//! Length-sorted batching: group rows of similar token length so a padded batch wastes little,
//! and shuffle batch order deterministically for training.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Row indices sorted by length (ascending; ties keep index order).
fn sorted_by_length(lengths: &[usize]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.sort_by_key(|&i| lengths[i]);
    idx
}

/// Batches of at most `batch_size` indices, sorted by length so each batch holds rows of
/// similar length. `batch_size` 0 is treated as 1. Every index appears exactly once.
pub fn by_length(lengths: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    sorted_by_length(lengths).chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect()
}

/// Batches sorted by length whose padded size (`rows × longest row`) stays within
/// `max_tokens`, with at most `max_batch` rows each. A row longer than `max_tokens` gets a batch
/// of its own. Every index appears exactly once.
pub fn by_token_budget(lengths: &[usize], max_tokens: usize, max_batch: usize) -> Vec<Vec<usize>> {
    let mut batches = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in sorted_by_length(lengths) {
        // ascending order: the new row is the longest of the batch
        let padded = (cur.len() + 1) * lengths[i];
        if !cur.is_empty() && (padded > max_tokens || cur.len() >= max_batch.max(1)) {
            batches.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// Shuffle the order of batches (not their contents) with a seeded ChaCha8 generator.
pub fn shuffle_batches(batches: &mut [Vec<usize>], seed: u64) {
    batches.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
}

/// Training batches: rows are shuffled (seeded), cut into pools of `pool_batches × batch_size`
/// rows, each pool is sorted by length and split into batches, then batch order is shuffled.
/// Batches hold rows of similar length without being the same batches every epoch (vary the
/// seed per epoch). Deterministic for a seed.
pub fn training_batches(lengths: &[usize], batch_size: usize, pool_batches: usize, seed: u64) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.shuffle(&mut rng);
    let mut batches = Vec::new();
    for pool in idx.chunks(batch_size * pool_batches.max(1)) {
        let mut pool = pool.to_vec();
        pool.sort_by_key(|&i| lengths[i]);
        batches.extend(pool.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Tokens a set of batches costs once each batch is padded to its longest row.
pub fn padded_tokens(lengths: &[usize], batches: &[Vec<usize>]) -> usize {
    batches.iter().map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap_or(0)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn random_lengths(seed: u64, n: usize) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(1..1024)).collect()
    }

    fn assert_partition(batches: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn by_length_sorts_and_cuts_padding() {
        let lengths = vec![5, 1, 9, 3, 7, 2];
        let b = by_length(&lengths, 2);
        assert_eq!(b, vec![vec![1, 5], vec![3, 0], vec![4, 2]]);
        let lengths = random_lengths(1, 1000);
        let sorted = by_length(&lengths, 8);
        assert_partition(&sorted, 1000);
        let plain: Vec<Vec<usize>> = (0..1000).collect::<Vec<_>>().chunks(8).map(<[usize]>::to_vec).collect();
        assert!(padded_tokens(&lengths, &sorted) * 3 < padded_tokens(&lengths, &plain) * 2);
    }

    #[test]
    fn by_token_budget_respects_budget() {
        let lengths = random_lengths(2, 500);
        let b = by_token_budget(&lengths, 4096, 16);
        assert_partition(&b, 500);
        for batch in &b {
            assert!(batch.len() <= 16);
            let max = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(batch.len() * max <= 4096 || batch.len() == 1);
        }
        // a row over the budget is alone
        assert_eq!(by_token_budget(&[10, 5000, 10], 100, 8), vec![vec![0, 2], vec![1]]);
        assert!(by_token_budget(&[], 100, 8).is_empty());
    }

    #[test]
    fn training_batches_are_deterministic_and_complete() {
        let lengths = random_lengths(3, 777);
        let a = training_batches(&lengths, 8, 16, 7);
        assert_eq!(a, training_batches(&lengths, 8, 16, 7));
        assert_ne!(a, training_batches(&lengths, 8, 16, 8));
        assert_partition(&a, 777);
        assert!(a.iter().all(|b| !b.is_empty() && b.len() <= 8));
        let mut s = by_length(&lengths, 4);
        let before = s.clone();
        shuffle_batches(&mut s, 11);
        let mut s2 = before.clone();
        shuffle_batches(&mut s2, 11);
        assert_eq!(s, s2);
        assert_ne!(s, before);
    }
}
